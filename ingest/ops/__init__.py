"""The operators' and billing's HTTP face: the ops API (aiohttp.web) and its console."""
