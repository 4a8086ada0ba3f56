"""Host-side network tests in throwaway network namespaces (root)."""
