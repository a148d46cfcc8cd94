from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("flows", "0002_intent_problem_internal"),
    ]

    operations = [
        migrations.AddField(
            model_name="pinintent",
            name="not_before",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
