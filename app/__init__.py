"""The STRIDE HTTP service: a thin layer over ``stride.query.Attributor``.

``app.main:app`` is the ASGI entry point; ``app.main.create_app`` builds one from explicit settings.
"""
