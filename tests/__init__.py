"""splitrelay."""
