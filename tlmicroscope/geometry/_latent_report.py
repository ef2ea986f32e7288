"""Report sections: latent projections and the norm profile."""
