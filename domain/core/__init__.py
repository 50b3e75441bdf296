"""What every feature of the domain shares: errors, the wire models and their base, the ports of
locks and progress, the step journal's records, the runner of external commands, paths, the
publish-once shape, sparse files and the disk.info record. It imports no feature."""
