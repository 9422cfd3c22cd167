"""``runner ui``: a local, read-only status page for an operator.

It runs on the operator's host, on a loopback address, and talks to the server over HTTP with
the operator credential (:class:`~privsep.runner.cli.operator_client.OperatorClient`), like
every other operator command; the browser holds only a session cookie of this page, never a
key or a server token. Pages are plain server-rendered HTML, every value escaped
(:mod:`~privsep.runner.ui.markup`); the one script is the log's live tail, served by the page
itself.

* :mod:`~privsep.runner.ui.markup`: escaping by construction (:class:`Html`, :func:`esc`).
* :mod:`~privsep.runner.ui.pages`: what each page fetches and shows.
* :mod:`~privsep.runner.ui.server`: the HTTP server, its one-time token, cookies and headers.
"""
