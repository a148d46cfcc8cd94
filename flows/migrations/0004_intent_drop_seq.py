from django.db import migrations


class Migration(migrations.Migration):
    """`seq` was bumped by every click and never read."""

    dependencies = [("flows", "0003_intent_not_before")]

    operations = [migrations.RemoveField(model_name="pinintent", name="seq")]
