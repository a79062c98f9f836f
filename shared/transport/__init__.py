"""Redis access: stream names, publish/read, heartbeats, pipeline runs, the blocking client."""
