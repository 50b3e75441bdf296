"""Message delivery: kombu's Redis transport made to lose nothing (broker, broker_peeks), and
which workers and hosts are alive (hosts, on the liveness mechanism they share with the
broker's consumers)."""
