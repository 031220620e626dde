"""Front ends (tokens or frames to vectors), the recurrent encoder, and the Lightning task modules."""
