"""Device meshes, logical-axis rules and multi-process set-up."""
