"""Explanation metrics: faithfulness, orthogonality, locality, concept recovery."""
