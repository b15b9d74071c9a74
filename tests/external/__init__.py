"""Code that stands in for a user's own package: it imports spacache_kernels, never the reverse."""
