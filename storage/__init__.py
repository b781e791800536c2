"""Persistence: the database (studies, series, jobs, results, audit) and the file store."""
