"""Domain types that every layer shares: users' models, generations, jobs. No HTTP, no torch."""
