"""Where a run's files live: local disks and buckets (gs://) behind one path type."""
