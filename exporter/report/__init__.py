"""``dict-rate-limit report``: the capacity-planning report (HTML or JSON) from the PostgreSQL history."""
