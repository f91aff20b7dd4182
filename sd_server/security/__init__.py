"""Who a request acts as (API keys), how much it may do (limits), and where webhooks may go."""
