"""The namespace lab, its services, the test client, the demo and the XDP test harness."""
