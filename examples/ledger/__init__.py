"""The ledger example: account statements built from the transfer service's events.

- :mod:`.models`   the ``statement_lines`` table;
- :mod:`.service`  the exactlyonce ``App`` (group ``ledger-service``) that adds
  one line per ``transfer-applied`` event, each account's lines in order;
- :mod:`.verify`   checks the statements against the transfer service's
  ``transfers`` and ``accounts`` tables.

``python -m examples.transfer.demo`` runs it beside the transfer service.
"""
