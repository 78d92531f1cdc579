"""Storage tiers. The CPU tier is built in; lower tiers come from plugins."""
