"""Usage accounting: cgroups, interface counters, ResourceStatistics."""
