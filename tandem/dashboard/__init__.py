"""Live demo dashboard: a FastAPI app serving one static page with canvas charts."""
