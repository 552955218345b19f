"""FreeFuse's adapter to classic Forge: the only package that imports Forge."""
