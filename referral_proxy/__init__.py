"""referral-proxy: an IMAP4rev1 front-end that refers or proxies each mailbox to its backend."""

__version__ = "0.1.0"
