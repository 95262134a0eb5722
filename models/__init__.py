"""The tutorial networks, their registry, and the model-side steps every backend shares."""
