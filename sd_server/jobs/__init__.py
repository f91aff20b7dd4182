"""Jobs: admission, the bounded queue, batching, the worker threads (device, loader, encoder), events, webhooks and
retention."""
