"""The typed messages of every Redis stream and the activation link's row flags."""
