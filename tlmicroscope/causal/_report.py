"""Report sections: causal basis energies."""
