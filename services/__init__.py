"""Process boundaries: Kafka I/O, the embedded broker, the command line."""
