"""spotserve: LLM serving on spot instances over NATS (the project library)."""

__version__ = "0.1.0"
