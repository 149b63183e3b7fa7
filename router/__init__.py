"""imm-router: routes Alibaba Cloud IMM events from Kafka to email, DingTalk and Kafka alerts.

The package reads as the data flow: sources (service) → decode → imm view → rules → render →
delivery stages → channels.
"""

__version__ = "0.1.0"
