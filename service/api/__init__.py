"""The HTTP API: the app factory (``app``), dependencies (``deps``), one error table (``errors``), the
generation logic every route shares (``generation``), and one router per resource (``routes/``)."""
