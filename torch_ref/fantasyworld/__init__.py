"""PyTorch reference of FantasyWorld (geometry branch on Wan2.1-I2V-14B); see docs/fantasyworld.md."""
