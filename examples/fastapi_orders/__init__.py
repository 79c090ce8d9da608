"""A FastAPI service that writes an order and enqueues its confirmation email together."""
