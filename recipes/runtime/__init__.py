"""Runtime: device choice, torchrun ranks and dev-set sharding, atomic output files."""
