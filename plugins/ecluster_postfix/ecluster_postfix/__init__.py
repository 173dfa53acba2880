"""ecluster-postfix: run Debian's Postfix behind ecluster's VIPs (see docs/POSTFIX.md)."""
