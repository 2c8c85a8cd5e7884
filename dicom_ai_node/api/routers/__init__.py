"""One router per resource (full-stack-fastapi-template shape); `app.create_app` mounts them all."""
