"""FantasyWorld's added modules in Flax NNX (geometry stream, bidirectional attention, camera conditioning,
heads); the joint forward with the Wan DiT is specified in docs/fantasyworld.md."""
