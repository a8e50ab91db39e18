"""Image tools: safe loading, the content-addressed image store, boxes, crop and zoom."""
