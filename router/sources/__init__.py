"""Where events come in: Kafka topics (kafka), the dead-letter topic again (replay)."""
