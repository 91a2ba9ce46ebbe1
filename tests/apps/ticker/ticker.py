"""Prints a numbered, timestamped line every 20 ms, so a test can see how soon `logs --follow`
shows it, and whether any line is lost when the log rotates."""
import sys
import time

count = 0
while True:
    count += 1
    print(f"tick {count} {time.time():.3f}", flush=True)
    time.sleep(0.02)
