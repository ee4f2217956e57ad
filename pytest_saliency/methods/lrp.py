"""Layer-wise relevance propagation: epsilon, z+, alpha-beta (to be written)."""
