"""Pure types every process shares: rows and micro-batches, configs, errors, speculation."""
