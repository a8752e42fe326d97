"""Identity: keys from identity providers, claim paths, the claims proof and the denylist."""
