"""Entry tasks: the operations a control plane calls, one message and one JSON argument each.

One module per operation (`imgprep.<operation>`); each validates its request, builds its canvas
(tasks.canvases) and hands its task id over to it (worker.app.entry.hand_over), so the caller's
task id ends on the final result.
"""
