"""The web console, the REST API (/api/v1), DICOMweb (/dicomweb) and /metrics.

``create_app(WebContext)`` builds the FastAPI application; ``WebServer`` runs
it inside ``ainode serve`` (config ``web.enabled``) or alone (``ainode web``).
"""

from node.web.app import create_app
from node.web.context import WebContext
from node.web.server import WebServer

__all__ = ["WebContext", "WebServer", "create_app"]
