from billing_service.cli import app

app(prog_name="billing")
