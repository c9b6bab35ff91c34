"""Common package of AI Cash Evolution: settings, infrastructure clients and the contracts between services."""
