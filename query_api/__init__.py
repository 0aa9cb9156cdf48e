"""The query service: search by image over HTTP (``python -m query_api``).

``create_app(components)`` builds the FastAPI app; the caller owns the components.
"""

from __future__ import annotations
