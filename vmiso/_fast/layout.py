"""The usage reader's record layout and file formats: one definition, used by the Cython reader
(stats.pyx builds its C tables from it at import) and by its pure-Python twin (stats_py.py).

A record is NFIELDS int64 slots per VM (-1: not available); each counter file has a kind (how
to parse it) and, for one-number files, the slot it fills.
"""

# --- record slots (int64 each; -1 = not available) ------------------------------------------
(F_UTIME_TICKS, F_STIME_TICKS, F_THREADS, F_RSS_PAGES,
 F_CPU_USAGE_US, F_CPU_USER_US, F_CPU_SYSTEM_US, F_ACCT_USER_TICKS, F_ACCT_SYSTEM_TICKS,
 F_NR_PERIODS, F_NR_THROTTLED, F_THROTTLED_US, F_THROTTLED_NS, F_CFS_QUOTA_US, F_CFS_PERIOD_US,
 F_MEM_CURRENT, F_MEM_LIMIT, F_MEM_SWAP_CURRENT,
 F_MEM_RSS, F_MEM_CACHE, F_MEM_SWAP, F_MEM_ACTIVE_ANON, F_MEM_INACTIVE_ANON,
 F_MEM_ACTIVE_FILE, F_MEM_INACTIVE_FILE, F_MEM_ANON, F_MEM_FILE,
 F_NET_RX_PACKETS, F_NET_RX_BYTES, F_NET_RX_ERRORS, F_NET_RX_DROPPED,
 F_NET_TX_PACKETS, F_NET_TX_BYTES, F_NET_TX_ERRORS, F_NET_TX_DROPPED,
 F_DISK_USED, NFIELDS) = range(37)

# --- file kinds ----------------------------------------------------------------------------------
K_INT = 0        # one integer (cpu.cfs_quota_us, memory.current, memory.max: "max" = UNLIMITED)
K_CPU_KV = 1     # "key value" lines: cpu.stat (v1 and v2), cpuacct.stat
K_MEM_KV = 2     # "key value" lines: memory.stat (v1 and v2)
K_PROC_STAT = 3  # /proc/<pid>/stat
K_CPU_MAX = 4    # v2 cpu.max: "<quota|max> <period>"
K_FSTAT = 5      # a file whose allocated bytes (st_blocks * 512) fill the slot
K_LIMIT = 8      # flag on K_INT or K_CPU_MAX: a limit, read at open and by refresh_limits() only
KINDS = frozenset((K_INT, K_CPU_KV, K_MEM_KV, K_PROC_STAT, K_CPU_MAX, K_FSTAT, K_INT | K_LIMIT, K_CPU_MAX | K_LIMIT))

UNLIMITED = (1 << 63) - 1
MAX_FILES = 16
BUF_SIZE = 16384  # a cgroup v2 memory.stat is ~1.5 KiB; more means it is not the file we think

CPU_KEYS = {
    b"usage_usec": F_CPU_USAGE_US, b"user_usec": F_CPU_USER_US, b"system_usec": F_CPU_SYSTEM_US,
    b"nr_periods": F_NR_PERIODS, b"nr_throttled": F_NR_THROTTLED,
    b"throttled_usec": F_THROTTLED_US, b"throttled_time": F_THROTTLED_NS,
    b"user": F_ACCT_USER_TICKS, b"system": F_ACCT_SYSTEM_TICKS,
}
MEM_KEYS = {
    b"total_rss": F_MEM_RSS, b"total_cache": F_MEM_CACHE, b"total_swap": F_MEM_SWAP,
    b"total_active_anon": F_MEM_ACTIVE_ANON, b"total_inactive_anon": F_MEM_INACTIVE_ANON,
    b"total_active_file": F_MEM_ACTIVE_FILE, b"total_inactive_file": F_MEM_INACTIVE_FILE,
    b"hierarchical_memory_limit": F_MEM_LIMIT, b"anon": F_MEM_ANON, b"file": F_MEM_FILE,
}
# /proc/net/dev columns 0-3 are the tap's receive bytes, packets, errs, drop and 8-11 its
# transmit ones; the guest's view swaps them.
NET_COLUMNS = ((0, F_NET_TX_BYTES), (1, F_NET_TX_PACKETS), (2, F_NET_TX_ERRORS), (3, F_NET_TX_DROPPED),
               (8, F_NET_RX_BYTES), (9, F_NET_RX_PACKETS), (10, F_NET_RX_ERRORS), (11, F_NET_RX_DROPPED))
PROC_STAT_FIELDS = ((11, F_UTIME_TICKS), (12, F_STIME_TICKS), (17, F_THREADS), (21, F_RSS_PAGES))
