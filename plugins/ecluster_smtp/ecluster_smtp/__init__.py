"""ecluster-smtp: the example ecluster plug-in, an SMTP receiver on the node's injection VIPs.

See :mod:`ecluster_smtp.service` and docs/PLUGINS.md in the ecluster repository.
"""
