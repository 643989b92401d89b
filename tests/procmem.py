"""A process's memory, from the kernel's own accounting (referral_proxy.testing.procmem)."""

from referral_proxy.testing.procmem import reset_peak, rss

__all__ = ["reset_peak", "rss"]
