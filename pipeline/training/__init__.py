"""Training the specialist: one loop, methods as strategies, pure schedules and losses."""
